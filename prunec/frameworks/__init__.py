"""Attribute updaters for framework classes (ultralytics, diffusers, timm), added to the
``module_sync`` table only when the framework has been imported by the user's code."""
