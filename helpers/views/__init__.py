"""Views: plots, tables, metrics files and the notebooks' look-inside views of real objects."""
