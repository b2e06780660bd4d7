"""What people look at: the console, pictures, tables, the servable model, predictions."""
