\echo Use "CREATE EXTENSION syncar_stamp" to load this file. \quit
CREATE FUNCTION syncar_stamp() RETURNS trigger LANGUAGE C AS 'MODULE_PATHNAME', 'syncar_stamp';
