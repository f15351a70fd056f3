"""Stages that rewrite a record's text and keep the record (redaction, cleanup)."""
