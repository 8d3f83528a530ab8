"""A log of identity changes, so each process can keep the platform-wide search's binary codes in memory.

`characters.platform_codes` holds every identity's `embedding_bits` in a numpy matrix and scans it there
(bench/README.md: PostgreSQL's row-at-a-time scan of 250k codes took 78-82 ms p95). To stay current it reads
this log: a trigger writes one row per inserted, updated or deleted identity, with the writing transaction's
id (`xid`). A reader that remembers the snapshot of its last read asks only for the rows of transactions that
snapshot did not see; no counter is shared between writers, so no writer waits on another.

A TRUNCATE of the identities logs a row without an identity: every reader loads everything again.
`characters_identity_log_state.pruned_below` is how far the log was pruned (`platform_codes.prune_log`, run
with the search-index sync every 5 minutes, deletes what is older than its previous run: `horizon`): a reader
whose snapshot is older than that loads everything again too.
"""

from django.db import migrations

FORWARD = """
CREATE TABLE characters_identity_log (
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    identity_id bigint,
    embedder varchar(40)
);
CREATE INDEX characters_identity_log_xid ON characters_identity_log (xid);
CREATE TABLE characters_identity_log_state (
    id smallint PRIMARY KEY CHECK (id = 1),
    pruned_below xid8 NOT NULL,
    horizon xid8 NOT NULL
);
INSERT INTO characters_identity_log_state VALUES (1, '0'::xid8, '0'::xid8);

CREATE FUNCTION characters_identity_logged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO characters_identity_log (identity_id, embedder) VALUES (NULL, NULL);
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO characters_identity_log (identity_id, embedder) VALUES (OLD.id, OLD.embedder);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.embedder IS DISTINCT FROM OLD.embedder) THEN
        INSERT INTO characters_identity_log (identity_id, embedder) VALUES (NEW.id, NEW.embedder);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER characters_identity_logged AFTER INSERT OR UPDATE OR DELETE ON characters_characteridentity
    FOR EACH ROW EXECUTE FUNCTION characters_identity_logged();
CREATE TRIGGER characters_identity_truncated AFTER TRUNCATE ON characters_characteridentity
    FOR EACH STATEMENT EXECUTE FUNCTION characters_identity_logged();
"""

BACKWARD = """
DROP TRIGGER characters_identity_truncated ON characters_characteridentity;
DROP TRIGGER characters_identity_logged ON characters_characteridentity;
DROP FUNCTION characters_identity_logged();
DROP TABLE characters_identity_log_state;
DROP TABLE characters_identity_log;
"""


class Migration(migrations.Migration):
    dependencies = [("characters", "0008_import_reaper_schedule")]
    operations = [migrations.RunSQL(FORWARD, BACKWARD)]
