"""The extras: each module adds one feature to the app through its init_app(app) (see EXTRAS in application.py)."""
