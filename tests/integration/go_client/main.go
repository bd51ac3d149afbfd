// Runs queries through clickhouse-go v2 over HTTP, the way Grafana's ClickHouse plugin does
// (Native format, client_protocol_version), and prints each result as one JSON line:
// {"columns": [...], "rows": [[...], ...]} or {"error": "..."}.
//
// usage: go_client HOST:PORT QUERY [QUERY ...]
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
)

type result struct {
	Columns []string `json:"columns,omitempty"`
	Types   []string `json:"types,omitempty"`
	Rows    [][]any  `json:"rows"`
	Error   string   `json:"error,omitempty"`
}

// plain turns what the driver scanned into JSON-friendly values: times as UTC
// "2006-01-02 15:04:05.000000", pointers dereferenced (nil -> null), slices (also []uint8)
// element by element, the rest as is.
func plain(v any) any {
	rv := reflect.ValueOf(v)
	for rv.Kind() == reflect.Pointer {
		if rv.IsNil() {
			return nil
		}
		rv = rv.Elem()
	}
	switch x := rv.Interface().(type) {
	case time.Time:
		return x.UTC().Format("2006-01-02 15:04:05.000000")
	}
	if rv.Kind() == reflect.Slice || rv.Kind() == reflect.Array {
		out := make([]any, rv.Len())
		for i := range out {
			out[i] = plain(rv.Index(i).Interface())
		}
		return out
	}
	return rv.Interface()
}

func run(ctx context.Context, conn clickhouse.Conn, query string) result {
	rows, err := conn.Query(ctx, query)
	if err != nil {
		return result{Error: err.Error()}
	}
	defer rows.Close()
	types := rows.ColumnTypes()
	res := result{Columns: rows.Columns(), Rows: [][]any{}}
	for _, t := range types {
		res.Types = append(res.Types, t.DatabaseTypeName())
	}
	for rows.Next() {
		values := make([]any, len(types))
		for i, t := range types {
			values[i] = reflect.New(t.ScanType()).Interface()
		}
		if err := rows.Scan(values...); err != nil {
			return result{Error: err.Error()}
		}
		row := make([]any, len(values))
		for i, v := range values {
			row[i] = plain(v)
		}
		res.Rows = append(res.Rows, row)
	}
	if err := rows.Err(); err != nil {
		return result{Error: err.Error()}
	}
	return res
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: go_client HOST:PORT QUERY [QUERY ...]")
		os.Exit(2)
	}
	conn, err := clickhouse.Open(&clickhouse.Options{
		Addr:        []string{os.Args[1]},
		Protocol:    clickhouse.HTTP,
		Auth:        clickhouse.Auth{Database: "switchboard", Username: "default"},
		DialTimeout: 10 * time.Second,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "open:", err)
		os.Exit(1)
	}
	defer conn.Close()
	ctx := context.Background()
	if err := conn.Ping(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "ping:", err)
		os.Exit(1)
	}
	out := json.NewEncoder(os.Stdout)
	for _, query := range os.Args[2:] {
		if err := out.Encode(run(ctx, conn, query)); err != nil {
			fmt.Fprintln(os.Stderr, "encode:", err)
			os.Exit(1)
		}
	}
}
