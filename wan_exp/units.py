"""Units shared by every module that turns bytes into the figures people read.

The lowest module of the package: it imports nothing, so anything may import it.
"""

GIB = 1024**3  # bytes in a gibibyte: every *_gib figure of a record, a table or a message
