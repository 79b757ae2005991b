-- Contract v1.1: the disposal-rule categories a chat answer was grounded
-- in (the `done` frame's `sources`), in order. Empty for turns stored
-- before it existed and for answers no rule applied to.
ALTER TABLE turns ADD COLUMN sources text[] NOT NULL DEFAULT '{}';
