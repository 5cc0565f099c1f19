"""The registered learners, one module each (``edgeclip.train.registry`` lists and imports them)."""
