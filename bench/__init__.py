"""`make bench`: this server side by side with its compute ceiling, its transport floor and the
serving systems a user would pick instead. Not installed with the package; run from the repo root
as `python -m bench`."""
