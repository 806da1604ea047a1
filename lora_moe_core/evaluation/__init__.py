"""Step 5, evaluation: held-out metrics, routing quality, plots and report.html."""
