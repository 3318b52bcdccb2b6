"""Inputs: storage, schemas, manifests, caption adapters and interventions."""
