"""Test and demo fixtures: a fault-injecting loopback image server, tiny models, sample data."""
