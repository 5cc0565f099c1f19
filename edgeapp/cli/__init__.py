"""The ``edgeclip`` command line (Typer): ``app.py`` builds it from the ``commands_*`` modules."""
