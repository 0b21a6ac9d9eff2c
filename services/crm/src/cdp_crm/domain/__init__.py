"""The CRM connector's domain: mappings, coalescing, budgets, batch isolation. No I/O here."""
