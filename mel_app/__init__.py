"""The application layer: the `mel` command line, the standalone Prefect server and worker, deployments.

It sits above everything (mel_core < tasks < flows < mel_app): it may import flows and Prefect; nothing
imports it.
"""
