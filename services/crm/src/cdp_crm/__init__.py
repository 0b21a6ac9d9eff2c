"""cdp CRM connector: mappings, one API budget per CRM account, outbound upserts and inbound changes."""
