"""The bottom of the import graph: errors and small utilities that every other package may use.
Imports nothing of ours."""
