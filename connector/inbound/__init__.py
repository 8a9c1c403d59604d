"""Customer.io reporting webhooks in: signature check, payload mapping, processing."""
