"""MLflow runs -> numbers -> pictures: the analysis side of a scaling study.

runs.py (records from MLflow or CSV), laws.py (functional forms), fit.py (robust fits,
uncertainty, CLI), frontier.py (compute-optimal points), plots.py, report.py (CLI).
Importing this package imports nothing heavy.
"""
