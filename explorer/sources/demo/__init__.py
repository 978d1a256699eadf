"""The bundled demo model: synthetic tasks with known answers, and the script that trains it."""
