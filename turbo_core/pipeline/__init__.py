"""The nightly pipeline's logic (the Airflow DAG in ``dags/`` only orchestrates it).
Torch-free at import: DAG files import this while the scheduler parses them."""
