"""The web dashboard: one page served by the API, driving the same ``/v1`` API with the user's key."""
