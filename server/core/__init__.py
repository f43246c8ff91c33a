"""What every API surface shares (see the package map in `server/__init__.py`)."""
