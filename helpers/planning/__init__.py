"""Planning: how much GPU memory and time a stage needs, and the recipe that fits a GPU."""
