"""The fleet services, owned by the application: the one HTTP client to the replicas (`client.py`) and
replica health, restarts and pre-warming (`health.py`). Steps read what these learned; they do not run
them."""
