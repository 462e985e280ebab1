"""Data: offline dataset sources and the records they yield."""
