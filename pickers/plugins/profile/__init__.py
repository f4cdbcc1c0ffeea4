"""Profile handlers (which scheduling profiles run, how their results combine) and P/D deciders."""
