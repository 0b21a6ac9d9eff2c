"""Channel adapters: one interface, one module per channel (email, SMS, push, webhook, in-app, CRM)."""
