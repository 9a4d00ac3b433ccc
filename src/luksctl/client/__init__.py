"""luksctl-client: status and open of luksctl hosts from a user's own machine, without root.

Standard library only, so that `pip install luksctl` (no `[server]` extra) is enough to run it.
"""
