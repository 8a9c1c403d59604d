"""Database access: engine and sessions, models, migrations, small key/value store."""
