-- Runs once, when the PostgreSQL volume is created: the router DB next to Airflow's metadata DB.
CREATE DATABASE agentic_router OWNER airflow;
