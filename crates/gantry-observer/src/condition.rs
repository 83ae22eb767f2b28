//! Observer conditions: a small expression language over the changed row.
//!
//! ```text
//! data.status == 'shipped' && data.total >= 100
//! changed_to('status', 'shipped') || (has_field('priority') && !(data.priority == null))
//! ```
//!
//! - `data.a.b` is the row after the change — for a DELETE, the deleted row; `before.a.b` is the
//!   row before it (UPDATE and DELETE). A missing field or image is `null`.
//! - Literals: numbers, `'single'` or `"double"` quoted strings, `true`, `false`, `null`.
//! - `==` `!=` `<` `<=` `>` `>=`; `&&`, `||`, `!`, parentheses. Numbers compare by value, so
//!   `100.00 == 100` is true (as 64-bit floats: about 15 significant digits). Values of different
//!   types are unequal, and ordering them is false. Strings order by bytes.
//! - A bare operand is true when it is JSON `true`.
//! - `has_field('a.b')`: the row (`data`) has the field (even if it is `null`).
//! - `field_changed('f')`: `before.f != data.f`; `changed_to('f', v)`: changed and `data.f == v`;
//!   `changed_from('f', v)`: changed and `before.f == v`. These need both images, which only an
//!   UPDATE has: an observer whose `events` include INSERT or DELETE is refused at config load
//!   (see [`Condition::needs`]), and evaluating them on an event without both images is an
//!   [`EvalError`], never a silent `false`. `before.*` needs a before image: refused for INSERT.
//!
//! Parse errors name the column and what was expected; unknown functions name themselves.

use std::fmt;

use serde_json::Value;

use crate::config::EventType;

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    expr: Expr,
    source: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(Operand, CmpOp, Operand),
    Truthy(Operand),
    HasField(Vec<String>),
    FieldChanged(Vec<String>),
    ChangedTo(Vec<String>, Value),
    ChangedFrom(Vec<String>, Value),
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Literal(Value),
    Data(Vec<String>),
    Before(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A condition that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct ParseError {
    /// 1-based column (in characters) where the problem is.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// A condition that cannot be evaluated on an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    /// The function compares the two images and the event lacks one.
    #[error("{function} needs the row before and after the change; a {op} event has only one")]
    NeedsBothImages {
        /// The function.
        function: &'static str,
        /// The event's operation.
        op: &'static str,
    },
}

/// The row images a condition is evaluated on.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    /// The operation.
    pub op: EventType,
    /// The row before (UPDATE, DELETE).
    pub before: Option<&'a Value>,
    /// The row after (INSERT, UPDATE).
    pub after: Option<&'a Value>,
}

impl Row<'_> {
    fn data(&self) -> Option<&Value> {
        match self.op {
            EventType::Delete => self.before,
            _ => self.after,
        }
    }
}

/// What a condition needs from the events it is evaluated on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// It reads `before.*`.
    pub before: bool,
    /// It compares the images (`field_changed`, `changed_to`, `changed_from`).
    pub both: bool,
}

impl Needs {
    /// Why the condition cannot work on `op` events, if it cannot.
    pub fn refuses(&self, op: EventType) -> Option<String> {
        match op {
            EventType::Insert | EventType::Delete if self.both => Some(format!(
                "field_changed, changed_to and changed_from compare the row before and after \
                 the change, and {} events have only one; watch only UPDATE",
                op.as_str()
            )),
            EventType::Insert if self.before => {
                Some("before.* reads the row before the change, and INSERT events have none".into())
            }
            _ => None,
        }
    }
}

impl Condition {
    /// Parses `source`.
    pub fn parse(source: &str) -> Result<Self, ParseError> {
        let tokens = lex(source)?;
        // Long `&&` / `||` chains nest as deeply as they are long, and evaluation recurses.
        if tokens.len() > MAX_TOKENS {
            return Err(ParseError {
                column: tokens[MAX_TOKENS].column,
                message: format!("longer than {MAX_TOKENS} tokens"),
            });
        }
        let mut p = Parser {
            tokens: &tokens,
            at: 0,
            end: source.chars().count() + 1,
        };
        let expr = p.or()?;
        if let Some(t) = p.peek() {
            return Err(ParseError {
                column: t.column,
                message: format!("unexpected {}", t.kind),
            });
        }
        Ok(Self {
            expr,
            source: source.to_owned(),
        })
    }

    /// The text it was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// What it needs of an event's images.
    pub fn needs(&self) -> Needs {
        let mut needs = Needs::default();
        self.expr.needs(&mut needs);
        needs
    }

    /// Evaluates it on `row`.
    pub fn eval(&self, row: Row<'_>) -> Result<bool, EvalError> {
        self.expr.eval(row)
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Expr {
    fn needs(&self, n: &mut Needs) {
        match self {
            Expr::Or(a, b) | Expr::And(a, b) => {
                a.needs(n);
                b.needs(n);
            }
            Expr::Not(a) => a.needs(n),
            Expr::Cmp(a, _, b) => {
                n.before |= matches!(a, Operand::Before(_)) || matches!(b, Operand::Before(_));
            }
            Expr::Truthy(a) => n.before |= matches!(a, Operand::Before(_)),
            Expr::HasField(_) => {}
            Expr::FieldChanged(_) | Expr::ChangedTo(..) | Expr::ChangedFrom(..) => n.both = true,
        }
    }

    fn eval(&self, row: Row<'_>) -> Result<bool, EvalError> {
        Ok(match self {
            Expr::Or(a, b) => a.eval(row)? || b.eval(row)?,
            Expr::And(a, b) => a.eval(row)? && b.eval(row)?,
            Expr::Not(a) => !a.eval(row)?,
            Expr::Cmp(a, op, b) => compare(&a.value(row), *op, &b.value(row)),
            Expr::Truthy(a) => a.value(row) == Value::Bool(true),
            Expr::HasField(path) => lookup(row.data(), path).is_some(),
            Expr::FieldChanged(path) => changed(row, path, "field_changed")?,
            Expr::ChangedTo(path, v) => {
                changed(row, path, "changed_to")? && json_eq(&field(row.after, path), v)
            }
            Expr::ChangedFrom(path, v) => {
                changed(row, path, "changed_from")? && json_eq(&field(row.before, path), v)
            }
        })
    }
}

impl Operand {
    fn value(&self, row: Row<'_>) -> Value {
        match self {
            Operand::Literal(v) => v.clone(),
            Operand::Data(path) => field(row.data(), path),
            Operand::Before(path) => field(row.before, path),
        }
    }
}

fn lookup<'a>(image: Option<&'a Value>, path: &[String]) -> Option<&'a Value> {
    let mut v = image?;
    for key in path {
        v = v.as_object()?.get(key)?;
    }
    Some(v)
}

fn field(image: Option<&Value>, path: &[String]) -> Value {
    lookup(image, path).cloned().unwrap_or(Value::Null)
}

fn changed(row: Row<'_>, path: &[String], function: &'static str) -> Result<bool, EvalError> {
    match (row.before, row.after) {
        (Some(_), Some(_)) => Ok(!json_eq(&field(row.before, path), &field(row.after, path))),
        _ => Err(EvalError::NeedsBothImages {
            function,
            op: row.op.as_str(),
        }),
    }
}

/// Equality with numbers compared by value, recursively.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => x == y,
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, a)| y.get(k).is_some_and(|b| json_eq(a, b)))
        }
        _ => a == b,
    }
}

fn compare(a: &Value, op: CmpOp, b: &Value) -> bool {
    use std::cmp::Ordering;
    let ordering = match (a, b) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .zip(y.as_f64())
            .and_then(|(x, y)| x.partial_cmp(&y)),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    };
    match op {
        CmpOp::Eq => json_eq(a, b),
        CmpOp::Ne => !json_eq(a, b),
        CmpOp::Lt => ordering == Some(Ordering::Less),
        CmpOp::Le => matches!(ordering, Some(Ordering::Less | Ordering::Equal)),
        CmpOp::Gt => ordering == Some(Ordering::Greater),
        CmpOp::Ge => matches!(ordering, Some(Ordering::Greater | Ordering::Equal)),
    }
}

// ------------------------------------------------------------------------------------ lexing

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Ident(String),
    Number(f64, String),
    Str(String),
    Dot,
    Comma,
    LParen,
    RParen,
    Not,
    And,
    Or,
    Cmp(CmpOp),
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Ident(s) => write!(f, "`{s}`"),
            Kind::Number(_, s) => write!(f, "number {s}"),
            Kind::Str(s) => write!(f, "string {s:?}"),
            Kind::Dot => f.write_str("`.`"),
            Kind::Comma => f.write_str("`,`"),
            Kind::LParen => f.write_str("`(`"),
            Kind::RParen => f.write_str("`)`"),
            Kind::Not => f.write_str("`!`"),
            Kind::And => f.write_str("`&&`"),
            Kind::Or => f.write_str("`||`"),
            Kind::Cmp(op) => f.write_str(match op {
                CmpOp::Eq => "`==`",
                CmpOp::Ne => "`!=`",
                CmpOp::Lt => "`<`",
                CmpOp::Le => "`<=`",
                CmpOp::Gt => "`>`",
                CmpOp::Ge => "`>=`",
            }),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    column: usize,
}

fn lex(source: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |column: usize, message: String| ParseError { column, message };
    while i < chars.len() {
        let c = chars[i];
        let column = i + 1;
        let two = |a: char, b: char| c == a && chars.get(i + 1) == Some(&b);
        let (kind, len) = if c.is_whitespace() {
            i += 1;
            continue;
        } else if two('&', '&') {
            (Kind::And, 2)
        } else if two('|', '|') {
            (Kind::Or, 2)
        } else if two('=', '=') {
            (Kind::Cmp(CmpOp::Eq), 2)
        } else if two('!', '=') {
            (Kind::Cmp(CmpOp::Ne), 2)
        } else if two('<', '=') {
            (Kind::Cmp(CmpOp::Le), 2)
        } else if two('>', '=') {
            (Kind::Cmp(CmpOp::Ge), 2)
        } else {
            match c {
                '<' => (Kind::Cmp(CmpOp::Lt), 1),
                '>' => (Kind::Cmp(CmpOp::Gt), 1),
                '!' => (Kind::Not, 1),
                '.' if !chars.get(i + 1).is_some_and(char::is_ascii_digit) => (Kind::Dot, 1),
                ',' => (Kind::Comma, 1),
                '(' => (Kind::LParen, 1),
                ')' => (Kind::RParen, 1),
                '\'' | '"' => {
                    let mut s = String::new();
                    let mut j = i + 1;
                    loop {
                        match chars.get(j) {
                            None => return Err(err(column, "unterminated string".into())),
                            Some('\\') => {
                                match chars.get(j + 1) {
                                    Some(&e) => s.push(e),
                                    None => {
                                        return Err(err(column, "unterminated string".into()));
                                    }
                                }
                                j += 2;
                            }
                            Some(&q) if q == c => break,
                            Some(&other) => {
                                s.push(other);
                                j += 1;
                            }
                        }
                    }
                    (Kind::Str(s), j + 1 - i)
                }
                c if c.is_ascii_digit() || c == '-' || c == '.' => {
                    let mut j = i + 1;
                    while let Some(&d) = chars.get(j) {
                        let exponent_sign =
                            matches!(d, '+' | '-') && matches!(chars.get(j - 1), Some('e' | 'E'));
                        if d.is_ascii_alphanumeric() || d == '.' || d == '_' || exponent_sign {
                            j += 1;
                        } else {
                            break;
                        }
                    }
                    let text: String = chars[i..j].iter().collect();
                    match text.parse::<f64>() {
                        Ok(v) if v.is_finite() => (Kind::Number(v, text), j - i),
                        _ => return Err(err(column, format!("bad number {text}"))),
                    }
                }
                c if c.is_alphabetic() || c == '_' => {
                    let mut j = i + 1;
                    while chars
                        .get(j)
                        .is_some_and(|d| d.is_alphanumeric() || *d == '_')
                    {
                        j += 1;
                    }
                    (Kind::Ident(chars[i..j].iter().collect()), j - i)
                }
                other => return Err(err(column, format!("unexpected character {other:?}"))),
            }
        };
        out.push(Token { kind, column });
        i += len;
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------ parsing

/// Nesting deeper than this is refused (bounded recursion on hostile input).
const MAX_DEPTH: usize = 64;
/// Conditions longer than this (in tokens) are refused.
const MAX_TOKENS: usize = 1024;

struct Parser<'a> {
    tokens: &'a [Token],
    at: usize,
    end: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn column(&self) -> usize {
        self.peek().map_or(self.end, |t| t.column)
    }

    fn fail<T>(&self, message: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            column: self.column(),
            message: message.into(),
        })
    }

    fn eat(&mut self, kind: &Kind) -> bool {
        if self.peek().is_some_and(|t| &t.kind == kind) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, kind: &Kind) -> Result<(), ParseError> {
        if self.eat(kind) {
            Ok(())
        } else {
            let found = self
                .peek()
                .map_or("the end".to_owned(), |t| t.kind.to_string());
            self.fail(format!("expected {kind}, found {found}"))
        }
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        self.or_at(0)
    }

    fn or_at(&mut self, depth: usize) -> Result<Expr, ParseError> {
        if depth > MAX_DEPTH {
            return self.fail(format!("nested deeper than {MAX_DEPTH}"));
        }
        let mut left = self.and(depth)?;
        while self.eat(&Kind::Or) {
            left = Expr::Or(Box::new(left), Box::new(self.and(depth)?));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut left = self.unary(depth)?;
        while self.eat(&Kind::And) {
            left = Expr::And(Box::new(left), Box::new(self.unary(depth)?));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Expr, ParseError> {
        if self.eat(&Kind::Not) {
            if depth > MAX_DEPTH {
                return self.fail(format!("nested deeper than {MAX_DEPTH}"));
            }
            return Ok(Expr::Not(Box::new(self.unary(depth + 1)?)));
        }
        self.comparison(depth)
    }

    fn comparison(&mut self, depth: usize) -> Result<Expr, ParseError> {
        if self.eat(&Kind::LParen) {
            let inner = self.or_at(depth + 1)?;
            self.expect(&Kind::RParen)?;
            return Ok(inner);
        }
        if let Some(Token {
            kind: Kind::Ident(name),
            ..
        }) = self.peek()
            && self
                .tokens
                .get(self.at + 1)
                .is_some_and(|t| t.kind == Kind::LParen)
        {
            let name = name.clone();
            return self.call(&name);
        }
        let left = self.operand()?;
        let op = match self.peek() {
            Some(Token {
                kind: Kind::Cmp(op),
                ..
            }) => *op,
            _ => return Ok(Expr::Truthy(left)),
        };
        self.at += 1;
        let right = self.operand()?;
        Ok(Expr::Cmp(left, op, right))
    }

    fn call(&mut self, name: &str) -> Result<Expr, ParseError> {
        let column = self.column();
        let arity = match name {
            "has_field" | "field_changed" => 1,
            "changed_to" | "changed_from" => 2,
            _ => {
                return Err(ParseError {
                    column,
                    message: format!(
                        "unknown function {name}(); known: has_field, field_changed, \
                         changed_to, changed_from"
                    ),
                });
            }
        };
        self.at += 2; // name and `(`
        let field = match self.peek().map(|t| t.kind.clone()) {
            Some(Kind::Str(s)) => {
                self.at += 1;
                let path: Vec<String> = s.split('.').map(str::to_owned).collect();
                if path.iter().any(String::is_empty) {
                    return Err(ParseError {
                        column,
                        message: format!("{name}(): bad field name {s:?}"),
                    });
                }
                path
            }
            _ => return self.fail(format!("{name}() takes a field name in quotes first")),
        };
        let value = if arity == 2 {
            self.expect(&Kind::Comma)?;
            match self.operand()? {
                Operand::Literal(v) => Some(v),
                _ => return self.fail(format!("{name}() takes a literal value second")),
            }
        } else {
            None
        };
        self.expect(&Kind::RParen)?;
        Ok(match (name, value) {
            ("has_field", _) => Expr::HasField(field),
            ("field_changed", _) => Expr::FieldChanged(field),
            ("changed_to", Some(v)) => Expr::ChangedTo(field, v),
            (_, v) => Expr::ChangedFrom(field, v.unwrap_or(Value::Null)),
        })
    }

    fn operand(&mut self) -> Result<Operand, ParseError> {
        let Some(token) = self.peek().cloned() else {
            return self.fail("expected a value, found the end");
        };
        self.at += 1;
        Ok(match token.kind {
            Kind::Number(v, text) => Operand::Literal(
                serde_json::Number::from_f64(v)
                    .map(Value::Number)
                    .ok_or_else(|| ParseError {
                        column: token.column,
                        message: format!("bad number {text}"),
                    })?,
            ),
            Kind::Str(s) => Operand::Literal(Value::String(s)),
            Kind::Ident(word) => match word.as_str() {
                "true" => Operand::Literal(Value::Bool(true)),
                "false" => Operand::Literal(Value::Bool(false)),
                "null" => Operand::Literal(Value::Null),
                "data" | "before" => {
                    let mut path = Vec::new();
                    while self.eat(&Kind::Dot) {
                        match self.peek().map(|t| t.kind.clone()) {
                            Some(Kind::Ident(key)) => {
                                self.at += 1;
                                path.push(key);
                            }
                            _ => {
                                return self.fail(format!("expected a field name after `{word}.`"));
                            }
                        }
                    }
                    if path.is_empty() {
                        return Err(ParseError {
                            column: token.column,
                            message: format!("`{word}` needs a field: `{word}.name`"),
                        });
                    }
                    if word == "data" {
                        Operand::Data(path)
                    } else {
                        Operand::Before(path)
                    }
                }
                other => {
                    return Err(ParseError {
                        column: token.column,
                        message: format!(
                            "unknown name `{other}`: fields are `data.name` or `before.name`, \
                             strings are quoted"
                        ),
                    });
                }
            },
            other => {
                return Err(ParseError {
                    column: token.column,
                    message: format!("expected a value, found {other}"),
                });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn eval(
        src: &str,
        op: EventType,
        before: Option<Value>,
        after: Option<Value>,
    ) -> Result<bool, EvalError> {
        let c = Condition::parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        c.eval(Row {
            op,
            before: before.as_ref(),
            after: after.as_ref(),
        })
    }

    fn insert(src: &str, row: Value) -> bool {
        eval(src, EventType::Insert, None, Some(row)).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(insert("data.total == 100", json!({"total": 100.00})));
        assert!(insert("data.total == 100.00", json!({"total": 100})));
        assert!(insert("100 == 100.0", json!({})));
        assert!(insert(
            "data.total >= 99.5 && data.total < 100.5",
            json!({"total": 100})
        ));
        assert!(!insert("data.total == '100'", json!({"total": 100})));
        assert!(!insert("data.total < 'x'", json!({"total": 100})));
        assert!(insert("data.total != '100'", json!({"total": 100})));
        assert!(insert(
            "data.tags == [1]".replace("[1]", "data.other").as_str(),
            json!({"tags": [1.0, {"a": 2}], "other": [1, {"a": 2.00}]})
        ));
    }

    #[test]
    fn exponents_and_a_length_limit() {
        assert!(insert(
            "data.x == 1e3 && data.y == 2.5E-1 && data.z < 1e+9",
            json!({"x": 1000, "y": 0.25, "z": 5})
        ));
        let long = vec!["data.a == 1"; 400].join(" && ");
        let e = Condition::parse(&long).unwrap_err();
        assert!(e.message.contains("longer than 1024 tokens"), "{e}");
        let fine = vec!["data.a == 1"; 150].join(" || ");
        assert!(insert(&fine, json!({"a": 1})));
    }

    #[test]
    fn logic_precedence_and_parentheses() {
        let row = json!({"a": 1, "b": 2, "s": "x", "on": true, "nested": {"k": "v"}});
        assert!(insert(
            "data.a == 1 || data.b == 0 && data.s == 'y'",
            row.clone()
        ));
        assert!(!insert(
            "(data.a == 1 || data.b == 0) && data.s == 'y'",
            row.clone()
        ));
        assert!(insert("!(data.a == 2) && !!data.on", row.clone()));
        assert!(insert(
            "data.nested.k == \"v\" && data.missing == null",
            row.clone()
        ));
        assert!(insert(
            "has_field('nested.k') && !has_field('nested.z')",
            row.clone()
        ));
        assert!(!insert("data.s", row.clone()));
        assert!(insert("data.on", row));
    }

    #[test]
    fn change_functions_on_updates() {
        let before = Some(json!({"status": "pending", "total": 100}));
        let after = Some(json!({"status": "shipped", "total": 100.00}));
        let on = |src: &str| eval(src, EventType::Update, before.clone(), after.clone()).unwrap();
        assert!(on("field_changed('status')"));
        assert!(!on("field_changed('total')"), "100 → 100.00 is no change");
        assert!(on("changed_to('status', 'shipped')"));
        assert!(!on("changed_to('status', 'pending')"));
        assert!(on("changed_from('status', 'pending')"));
        assert!(on("before.status == 'pending' && data.status == 'shipped'"));
    }

    #[test]
    fn change_functions_without_a_before_image_are_errors_not_false() {
        let err = eval(
            "field_changed('status')",
            EventType::Insert,
            None,
            Some(json!({"status": "x"})),
        );
        assert_eq!(
            err,
            Err(EvalError::NeedsBothImages {
                function: "field_changed",
                op: "INSERT"
            })
        );
        let err = eval(
            "changed_from('s', 1)",
            EventType::Delete,
            Some(json!({"s": 1})),
            None,
        );
        assert!(matches!(
            err,
            Err(EvalError::NeedsBothImages {
                function: "changed_from",
                ..
            })
        ));
        // `data` on a DELETE is the deleted row.
        assert_eq!(
            eval(
                "data.s == 1",
                EventType::Delete,
                Some(json!({"s": 1})),
                None
            ),
            Ok(true)
        );
    }

    #[test]
    fn needs_tell_which_events_a_condition_can_work_on() {
        let c = Condition::parse("changed_to('status', 'x')").unwrap();
        assert!(c.needs().refuses(EventType::Insert).is_some());
        assert!(c.needs().refuses(EventType::Delete).is_some());
        assert!(c.needs().refuses(EventType::Update).is_none());
        let c = Condition::parse("before.status == 'x'").unwrap();
        assert!(c.needs().refuses(EventType::Insert).is_some());
        assert!(c.needs().refuses(EventType::Delete).is_none());
        let c = Condition::parse("data.status == 'x'").unwrap();
        assert_eq!(c.needs(), Needs::default());
    }

    #[test]
    fn parse_errors_name_the_column_and_the_problem() {
        let e = |src: &str| Condition::parse(src).unwrap_err();
        assert_eq!(
            e("data.a == ").to_string(),
            "column 11: expected a value, found the end"
        );
        assert!(
            e("is_big(data.a)")
                .message
                .starts_with("unknown function is_big()")
        );
        assert_eq!(e("is_big(data.a)").column, 1);
        assert_eq!(
            e("data.a == 'x").to_string(),
            "column 11: unterminated string"
        );
        assert!(
            e("status == 'x'")
                .message
                .starts_with("unknown name `status`")
        );
        assert_eq!(
            e("(data.a == 1").to_string(),
            "column 13: expected `)`, found the end"
        );
        assert_eq!(
            e("data.a == 1 data.b").to_string(),
            "column 13: unexpected `data`"
        );
        assert!(
            e("field_changed(data.a)")
                .message
                .contains("field name in quotes")
        );
        assert!(
            e("changed_to('a', data.b)")
                .message
                .contains("literal value")
        );
        assert!(e("data. == 1").message.contains("field name after `data.`"));
        assert!(e("data == 1").message.contains("needs a field"));
        assert!(e("data.a = 1").message.contains("unexpected character '='"));
        assert!(
            e(&format!("{}data.a{}", "(".repeat(100), ")".repeat(100)))
                .message
                .contains("nested deeper")
        );
        assert!(
            e(&format!("{}data.a", "!".repeat(100)))
                .message
                .contains("nested deeper")
        );
    }

    proptest! {
        #[test]
        fn any_text_parses_or_errors_without_panicking(src in "\\PC{0,60}") {
            let _ = Condition::parse(&src);
        }

        #[test]
        fn any_token_soup_parses_or_errors_without_panicking(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("data.a"), Just("before.b"), Just("=="), Just("!="), Just("<"),
                    Just("&&"), Just("||"), Just("!"), Just("("), Just(")"), Just("'x'"),
                    Just("1.5"), Just("null"), Just("field_changed('a')"), Just("has_field("),
                    Just(","), Just("changed_to('a', 2)"), Just("true"),
                ],
                0..20,
            ),
            a in proptest::option::of(any::<i32>()),
            b in proptest::option::of(".{0,5}"),
        ) {
            let src = parts.join(" ");
            if let Ok(c) = Condition::parse(&src) {
                let before = json!({"b": b, "a": a});
                let after = json!({"a": a, "b": 1});
                for op in [EventType::Insert, EventType::Update, EventType::Delete] {
                    let _ = c.eval(Row { op, before: Some(&before), after: Some(&after) });
                    let _ = c.eval(Row { op, before: None, after: Some(&after) });
                }
            }
        }
    }
}
