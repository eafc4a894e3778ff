"""Beam stages: small typed DoFns and ModelHandlers over plain functions."""
