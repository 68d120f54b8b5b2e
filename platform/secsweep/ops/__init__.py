"""Pure tensor operations (triggers, schedules, metrics): no I/O, no ray, no mlflow."""
