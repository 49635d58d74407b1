"""kstep's implementation. Private: rely on what ``kstep/__init__.py`` exports."""
