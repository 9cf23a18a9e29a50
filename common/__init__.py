"""Small utilities every layer shares (files written atomically, command-line flag spelling); imports
nothing from the rest of the project."""
