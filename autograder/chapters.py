"""The course's chapters, in order. Each id is a folder and notebook name under solutions/."""
CHAPTERS = ["ch01_attention", "ch02_masking", "ch03_multihead"]
