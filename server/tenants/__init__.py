"""Tenants: who is calling (an API key from the key file, the environment or the database),
what it may do (models, rate limits, token quotas, concurrent generations, a fair-queue
weight), and what it used (by day, in the database). See docs/tenants.md."""
