"""Django database backend: PostgreSQL, with the embedded server started on first connection.

`ENGINE: "alkemy.embedded_db"` with `PGDATA` pointing at the data directory. Starting lazily
(instead of at settings import) keeps commands that never touch the database fast.
"""

from django.db.backends.postgresql import base as postgresql

from alkemy.embedded_db import ensure_database, ensure_server


class DatabaseWrapper(postgresql.DatabaseWrapper):
    def get_connection_params(self):
        server = ensure_server(self.settings_dict["PGDATA"])
        self.settings_dict.update(
            {"HOST": str(server.socket_dir), "PORT": str(server.port), "USER": server.user, "PASSWORD": ""}
        )
        params = super().get_connection_params()
        if params.get("dbname") not in (None, "postgres"):
            ensure_database(server, params["dbname"])
        return params
