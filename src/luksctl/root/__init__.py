"""The root side: the luksctl CLI and the LUKS operations it runs. Standard library only."""
