"""Platform layer: configuration, run directories, storage, lineage, manifests, the demo crawl and the CLI.

Dependencies point one way: ``infra`` <- ``curation`` / ``training`` / ``evaluation`` <- ``flows``.
"""
