"""Users as both pipelines see them: which user a platform message or a webhook is about, and
the merge of the users created from webhooks into the ones the platform sends."""
