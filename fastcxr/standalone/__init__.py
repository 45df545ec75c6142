"""Files fastcxr ships into an export folder, to be used there without fastcxr."""
