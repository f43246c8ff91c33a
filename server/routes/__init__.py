"""Thin routes: parse, call a service, map its result to a response."""
