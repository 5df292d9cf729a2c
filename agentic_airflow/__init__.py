"""What runs inside Airflow: :class:`AgenticRunOperator` and the trigger it defers on.

Imports of Airflow live here only; nothing else in the project imports Airflow.
"""
