"""Protocol definitions (package digits.v1) and their generated, committed stubs."""
