"""The offline demo crawl: built from package-shipped images, served over HTTP on 127.0.0.1."""
