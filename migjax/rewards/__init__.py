"""Outcome rewards: answer extraction, verification and format checks."""
