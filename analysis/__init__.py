"""From MLflow runs to pandas frames, the paper's tables, figures and checks; notebooks import it."""
