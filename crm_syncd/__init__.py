"""crm-syncd: keeps Citadel CRM up to date with the people a Mac's owner talks to."""

__version__ = "0.1.0"
