/*
 * syncar_stamp: syncar's version stamp as a C trigger function, an optional extension.
 *
 * Every row written to a table syncar caches takes a fresh version from syncar's sequence in
 * a BEFORE INSERT OR UPDATE ... FOR EACH ROW trigger. syncar installs a PL/pgSQL stamp
 * everywhere; where this extension is available (`CREATE EXTENSION syncar_stamp`, which a
 * role with CREATE on the database may run: the extension is trusted), `syncar migrate` uses
 * this function instead. It does the same work for about half the cost to the writer
 * (BENCHMARKS.md, "Where the version stamp's cost goes"): no PL/pgSQL call and no
 * subtransaction per row.
 *
 * It keeps the PL/pgSQL stamp's rules (ARCHITECTURE.md, "Schema changes"):
 * - the version comes from nextval() on syncar's sequence, taken in the BEFORE ROW trigger,
 *   so under the row's lock, with the writer's privileges (a role without USAGE on the
 *   sequence fails, loudly, as it does with the PL/pgSQL stamp);
 * - the version column is found by name, else by its attribute number (fixed for the
 *   column's life: a renamed column is still stamped), then only if it is a bigint and the
 *   table is the one the trigger was made for (a dump and restore renumbers columns and
 *   gives the table a new OID: a number must never stamp a column of the customer's);
 * - a column that is gone, or retyped to a type that cannot hold the version, leaves the row
 *   unstamped: a customer's schema change never makes the customer's statement fail.
 *
 * Trigger arguments, as syncar writes them:
 *   syncar_stamp('<version column>', '<its attnum>', '<the table's OID>', '<sequence schema>',
 *                '<sequence name>')
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/syscache.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(syncar_stamp);

/*
 * What one execution of a statement resolved once: the trigger's FmgrInfo (and so its
 * fn_extra) lives for one execution of one statement on one relation, under that
 * relation's lock, so neither the sequence's OID nor the table's columns change under it.
 */
typedef struct StampPlan
{
	Oid			sequence;		/* InvalidOid: the sequence is gone, stamp nothing */
	int			attnum;			/* 0: no column to stamp */
	Oid			type;			/* the column's type */
} StampPlan;

/*
 * The sequence's OID by its schema's and its own name, kept for the backend's life: looking
 * it up costs a single-row UPDATE about 1 % more instructions. Forgotten at any change to
 * pg_class or pg_namespace (a syscache invalidation, delivered when this backend takes a
 * lock it did not hold), so it is never staler than the syscache a lookup would read.
 */
static struct
{
	bool		valid;
	Oid			sequence;
	char		schema[NAMEDATALEN];
	char		name[NAMEDATALEN];
}			sequence_cache;
static bool sequence_cache_watched = false;

static void
forget_sequence(Datum arg, int cacheid, uint32 hashvalue)
{
	sequence_cache.valid = false;
}

static Oid
sequence_oid(const char *schema, const char *name)
{
	Oid			namespace;
	Oid			sequence;

	if (!sequence_cache_watched)
	{
		CacheRegisterSyscacheCallback(RELNAMENSP, forget_sequence, (Datum) 0);
		CacheRegisterSyscacheCallback(NAMESPACENAME, forget_sequence, (Datum) 0);
		sequence_cache_watched = true;
	}

	if (sequence_cache.valid && strcmp(sequence_cache.schema, schema) == 0 &&
		strcmp(sequence_cache.name, name) == 0)
		return sequence_cache.sequence;
	/* Valid from before the lookups: an invalidation they let in clears it again. */
	strlcpy(sequence_cache.schema, schema, NAMEDATALEN);
	strlcpy(sequence_cache.name, name, NAMEDATALEN);
	sequence_cache.valid = true;
	namespace = get_namespace_oid(schema, true);
	sequence = OidIsValid(namespace) ? get_relname_relid(name, namespace) : InvalidOid;
	/* A table or view of that name is no sequence: nextval would raise. */
	if (OidIsValid(sequence) && get_rel_relkind(sequence) != RELKIND_SEQUENCE)
		sequence = InvalidOid;
	sequence_cache.sequence = sequence;
	return sequence;
}

static StampPlan *
plan_for(FunctionCallInfo fcinfo, TriggerData *td)
{
	StampPlan  *plan = (StampPlan *) fcinfo->flinfo->fn_extra;
	char	  **args = td->tg_trigger->tgargs;
	TupleDesc	desc = RelationGetDescr(td->tg_relation);
	int			attnum;

	if (plan != NULL)
		return plan;
	plan = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(StampPlan));
	plan->sequence = sequence_oid(args[3], args[4]);
	attnum = SPI_fnumber(desc, args[0]);
	if (attnum > 0)
	{
		/*
		 * Found by name: an integer type (retyped by the customer) takes it; a numeric only
		 * without a declared precision, which the version could break.
		 */
		Form_pg_attribute attr = TupleDescAttr(desc, attnum - 1);

		plan->type = attr->atttypid;
		if (plan->type == INT8OID || plan->type == INT4OID || plan->type == INT2OID ||
			(plan->type == NUMERICOID && attr->atttypmod < 0))
			plan->attnum = attnum;
	}
	else
	{
		/*
		 * Renamed: the attribute number stays the column's until it is dropped. Only on the
		 * table the trigger was made for (a restore gives it a new OID, and renumbers its
		 * columns), and only a bigint: a number must never stamp a column of the customer's.
		 */
		attnum = atoi(args[1]);
		if (RelationGetRelid(td->tg_relation) == atooid(args[2]) &&
			attnum > 0 && attnum <= desc->natts &&
			!TupleDescAttr(desc, attnum - 1)->attisdropped &&
			TupleDescAttr(desc, attnum - 1)->atttypid == INT8OID)
		{
			plan->type = INT8OID;
			plan->attnum = attnum;
		}
	}
	fcinfo->flinfo->fn_extra = plan;
	return plan;
}

Datum
syncar_stamp(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	HeapTuple	tuple;
	StampPlan  *plan;
	int64		version;
	Datum		value;
	bool		isnull = false;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_BEFORE(td->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(td->tg_event) || TRIGGER_FIRED_BY_DELETE(td->tg_event))
		elog(ERROR, "syncar_stamp: must be fired BEFORE INSERT OR UPDATE, FOR EACH ROW");
	if (td->tg_trigger->tgnargs != 5)
		elog(ERROR, "syncar_stamp: takes 5 arguments (version column, its attnum, the table's OID, sequence schema, sequence), got %d",
			 td->tg_trigger->tgnargs);
	tuple = TRIGGER_FIRED_BY_UPDATE(td->tg_event) ? td->tg_newtuple : td->tg_trigtuple;
	plan = plan_for(fcinfo, td);
	if (!OidIsValid(plan->sequence) || plan->attnum == 0)
		return PointerGetDatum(tuple);
	version = nextval_internal(plan->sequence, true);
	switch (plan->type)
	{
		case INT8OID:
			value = Int64GetDatum(version);
			break;
		case INT4OID:
			if (version > PG_INT32_MAX || version < PG_INT32_MIN)
				return PointerGetDatum(tuple);
			value = Int32GetDatum((int32) version);
			break;
		case INT2OID:
			if (version > PG_INT16_MAX || version < PG_INT16_MIN)
				return PointerGetDatum(tuple);
			value = Int16GetDatum((int16) version);
			break;
		default:
			value = DirectFunctionCall1(int8_numeric, Int64GetDatum(version));
			break;
	}
	return PointerGetDatum(heap_modify_tuple_by_cols(tuple, RelationGetDescr(td->tg_relation),
													 1, &plan->attnum, &value, &isnull));
}
