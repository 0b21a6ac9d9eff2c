"""Local CRM emulators (Salesforce, HubSpot, Dynamics 365, Zoho) for tests and `make up`."""
