"""The peers hub is measured against (see bench/README.md)."""
